"""At a window's first micro-batch on DDP, forward_backward's agreement vote waits for the vote DDP's
backward casts anyway (twinkle_worker.backward.vote_after_backward): one collective fewer a step. A call
refused on one rank then still changes nothing on the others, which ran their forward and backward
before they heard of it: their gradients, the RNG their dropout drew from and the accumulation count the
refused request carried are put back. Two real workers over gloo (the session's pool), LoRA with dropout
so that the RNG matters; the reference is the same mesh, seed and data that never saw the refused calls.
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

ADAPTER = "dropout"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "target_modules": "all-linear"}
TIMEOUT_SECONDS = 60
ANSWER_SECONDS = 20  # generous on 2 shared cores, a third of the process-group timeout


def _rows(seed: int, rows: int = 4, length: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (rows, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.roll(ids, -1, axis=1)}


def _start(mesh_model):  # type: ignore[no-untyped-def]
    model = mesh_model(
        config=tiny_config(),
        device_mesh=DeviceMesh.from_sizes(dp_size=2),
        seed=SEED,
        rendezvous_timeout=TIMEOUT_SECONDS,
    )
    model.add_adapter_to_model(ADAPTER, LORA)
    model.set_optimizer("AdamW", lr=1e-2, adapter_name=ADAPTER)
    return model


def _step(model, seed: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """One window of one micro-batch: the loss and the grad norm (dropout draws from the RNG in both)."""
    out, step = model.forward_backward_and_step(_rows(seed), adapter_name=ADAPTER, max_grad_norm=1.0)
    assert step["applied"], step
    return float(out["loss"]), float(step["grad_norm"])


def _refuse_on_rank_1(model, fused: bool) -> None:  # type: ignore[no-untyped-def]
    """A window's first micro-batch that rank 1 refuses (its labels do not match its input_ids) and rank 0
    runs: rank 0 hears of it only in the post-backward vote, and must undo its forward and backward.
    The request also carries gradient_accumulation_steps=3, which rank 0 must not keep."""

    def request(arrays: dict[str, np.ndarray]) -> worker_pb2.ForwardBackwardRequest:
        message = worker_pb2.ForwardBackwardRequest(adapter_name=ADAPTER, gradient_accumulation_steps=3)
        tensors.map_to_proto(arrays, message.inputs)
        if fused:
            message.step.max_grad_norm = 1.0
        return message

    good = {key: value[:2] for key, value in _rows(7).items()}
    bad = {**good, "labels": good["labels"][:, :5]}
    started = time.monotonic()
    calls = model.coordinator.submit("ForwardBackward", [request(good), request(bad)])
    with pytest.raises(InvalidArgument, match=r"rank 1 .*labels"):
        model.coordinator.gather("ForwardBackward", calls)
    rank0: Any = calls[0].outcome.exception(timeout=TIMEOUT_SECONDS * 2)
    assert rank0 is not None and rank0.code() == grpc.StatusCode.ABORTED, rank0
    assert "rank(s) [1] refused this call" in rank0.details(), rank0.details()
    # rank 0 ran the micro-batch before the vote (the vote after the backward) and put it back
    assert "forward and backward were undone: nothing changed" in rank0.details(), rank0.details()
    assert time.monotonic() - started < ANSWER_SECONDS


def test_a_refusal_heard_after_the_backward_changes_nothing(mesh_model) -> None:  # type: ignore[no-untyped-def]
    clean_model = _start(mesh_model)
    clean = [_step(clean_model, seed) for seed in (1, 2, 3)]
    clean_model.close()

    model = _start(mesh_model)
    seen = [_step(model, 1)]  # wraps the model: the next windows vote after their backward
    _refuse_on_rank_1(model, fused=False)
    _refuse_on_rank_1(model, fused=True)
    assert "micro_step: 1" in model.get_train_configs(ADAPTER)  # the window did not move
    seen += [_step(model, seed) for seed in (2, 3)]
    # Same seed, data and operations in fp32 as the clean run: the refusals left no trace, the RNG included.
    assert seen == pytest.approx(clean, rel=1e-6)
