"""The fused call (forward_backward_and_step: ForwardBackwardRequest.step) trains exactly as
forward_backward followed by clip_grad_and_step, on 2 ranks (DDP with LoRA inline, FSDP2 full with
logits back, i.e. streamed and through shared memory), and a refused step refuses the whole call
before the forward: nothing changes on any rank, also when the step is refused on one rank only
(its peer answers ABORTED PEER_REFUSED).
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from dist_reference import ADAPTER, GAS, LR, MAX_GRAD_NORM, SEED, STEPS, lora_config, make_windows, tiny_config

from twinkle_protocol import tensors
from twinkle_protocol._proto import worker_pb2
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument
from twinkle_protocol.mesh import DeviceMesh

CASES = {
    "ddp-lora-inline": (DeviceMesh.from_sizes(dp_size=2), "accelerate", "lora", False),
    "fsdp2-full-logits": (DeviceMesh.from_sizes(fsdp_size=2), "native_fsdp", "full", True),
}


def _train(model: Any, tuning: str, fused: bool, return_logits: bool) -> dict[str, Any]:
    """STEPS windows of GAS micro-batches, either as two calls per micro-batch or one fused call."""
    adapter = ADAPTER if tuning == "lora" else None
    if adapter:
        model.add_adapter_to_model(adapter, lora_config())
    model.set_optimizer("AdamW", lr=LR, adapter_name=adapter)
    run: dict[str, Any] = {"losses": [], "logps": [], "logits": [], "steps": []}
    for window in make_windows(seed=1, steps=STEPS, gas=GAS, batch_size=5):
        for batch in window:
            common = {"adapter_name": adapter, "gradient_accumulation_steps": GAS}
            if fused:
                out, step = model.forward_backward_and_step(
                    batch, max_grad_norm=MAX_GRAD_NORM[tuning], return_logits=return_logits, **common
                )
            else:
                out = model.forward_backward(batch, return_logits=return_logits, **common)
                step = model.clip_grad_and_step(max_grad_norm=MAX_GRAD_NORM[tuning], **common)
            run["losses"].append(out["loss"])
            run["logps"].append(out["logps"])
            run["logits"].append(out.get("logits"))
            run["steps"].append(step)
    run["weights"] = model.export_weights(adapter)
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_fused_call_trains_exactly_as_the_two_calls(mesh_model, case: str) -> None:  # type: ignore[no-untyped-def]
    mesh, strategy, tuning, return_logits = CASES[case]
    runs = {}
    for fused in (False, True):
        model = mesh_model(config=tiny_config(), device_mesh=mesh, strategy=strategy, seed=SEED)
        runs[fused] = _train(model, tuning, fused, return_logits)
        model.close()  # the pool serves one client at a time
    separate, together = runs[False], runs[True]
    assert [step["applied"] for step in together["steps"]] == [False, True] * STEPS
    assert together["steps"] == separate["steps"]  # grad norms, lr, counters: bit for bit
    assert together["losses"] == separate["losses"]
    for got, want in zip(together["logps"] + together["logits"], separate["logps"] + separate["logits"], strict=True):
        if want is not None:
            for got_row, want_row in zip(got, want, strict=True):
                np.testing.assert_array_equal(got_row, want_row)
    assert together["logits"][0] is not None or not return_logits
    assert together["weights"].keys() == separate["weights"].keys()
    for name, value in separate["weights"].items():
        np.testing.assert_array_equal(np.asarray(together["weights"][name]), np.asarray(value), err_msg=name)


def test_a_refused_step_refuses_the_whole_call(mesh_model) -> None:  # type: ignore[no-untyped-def]
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    batch = make_windows(seed=2, steps=1, gas=1, batch_size=4)[0][0]
    before = model.export_weights()
    with pytest.raises(FailedPrecondition, match="no optimizer") as refused:  # the step's check, before the forward
        model.forward_backward_and_step(batch, max_grad_norm=1.0, gradient_accumulation_steps=1)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    model.set_optimizer("AdamW", lr=LR)
    with pytest.raises(InvalidArgument, match=r"rank \d.*step\.max_grad_norm"):
        model.forward_backward_and_step(batch, max_grad_norm=float("nan"), gradient_accumulation_steps=1)
    # Nothing moved: no micro-batch was counted (a window of one would be complete) and no gradient kept.
    step = model.clip_grad_and_step(gradient_accumulation_steps=1)
    assert step["applied"] is False and step["micro_step"] == 0, step
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(model.export_weights()[name]), np.asarray(value), err_msg=name)
    out, step = model.forward_backward_and_step(batch, max_grad_norm=1.0, gradient_accumulation_steps=1)
    assert step["applied"] is True and step["micro_step"] == 1 and step["optimizer_step"] == 1, step
    assert np.isfinite(out["loss"])


def _fused_request(arrays: dict[str, np.ndarray], **step: Any) -> worker_pb2.ForwardBackwardRequest:
    request = worker_pb2.ForwardBackwardRequest(gradient_accumulation_steps=1)
    request.step.CopyFrom(worker_pb2.ClipGradAndStepRequest(**{"max_grad_norm": 1.0, **step}))
    tensors.map_to_proto(arrays, request.inputs)
    return request


def test_a_step_refused_on_one_rank_refuses_the_call_on_both(mesh_model) -> None:  # type: ignore[no-untyped-def]
    model = mesh_model(config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=SEED)
    model.set_optimizer("AdamW", lr=LR)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (2, 8)).astype(np.int64)
    rows = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.roll(ids, -1, axis=1)}
    before = model.export_weights()
    for bad, match in (
        ({"max_grad_norm": float("nan")}, "step.max_grad_norm"),
        ({"adapter_name": "x"}, "step.adapter_name"),
    ):
        calls = model.coordinator.each("ForwardBackward", [_fused_request(rows), _fused_request(rows, **bad)])
        with pytest.raises(InvalidArgument, match=rf"rank 1 .*{match}"):
            model.coordinator.gather("ForwardBackward", calls)
        rank0: Any = calls[0].outcome.exception(timeout=120)
        assert rank0 is not None and rank0.code() == grpc.StatusCode.ABORTED, rank0
        assert "rank(s) [1] refused this call" in rank0.details()
    step = model.clip_grad_and_step(gradient_accumulation_steps=1)  # nothing was counted on either rank
    assert step["applied"] is False and step["micro_step"] == 0, step
    after = model.export_weights()
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)
    calls = model.coordinator.each("ForwardBackward", [_fused_request(rows), _fused_request(rows)])
    replies = model.coordinator.gather("ForwardBackward", calls)
    assert [reply.step.applied for reply in replies] == [True, True] and replies[0].step.optimizer_step == 1
