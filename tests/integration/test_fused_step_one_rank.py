"""On one rank, the fused call (forward_backward_and_step) trains exactly as forward_backward followed by
clip_grad_and_step: the same losses, step results and weights, bit for bit, with a window of 2
micro-batches and a per-step lr override (optim_params)."""

from __future__ import annotations

from typing import Any

import numpy as np

STEPS, GAS = 2, 2


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(STEPS * GAS):
        ids = rng.integers(0, 256, (3, 9)).astype(np.int64)
        labels = np.roll(ids, -1, axis=1)
        labels[:, :2] = -100  # a prompt
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
    return batches


def _train(model: Any, fused: bool) -> tuple[list[Any], dict[str, Any]]:
    model.set_optimizer("AdamW", lr=1e-3)
    seen = []
    for batch in _batches():
        step_args = {"max_grad_norm": 0.5, "gradient_accumulation_steps": GAS, "optim_params": {"lr": 2e-3}}
        if fused:
            out, step = model.forward_backward_and_step(batch, **step_args)
        else:
            out = model.forward_backward(batch, gradient_accumulation_steps=GAS)
            step = model.clip_grad_and_step(**step_args)
        seen.append((out["loss"], [row.tolist() for row in out["logps"]], step))
    return seen, model.export_weights()


def test_fused_call_trains_exactly_as_the_two_calls_on_one_rank(remote, config) -> None:  # type: ignore[no-untyped-def]
    runs = {}
    for fused in (False, True):
        model = remote(config=config, seed=0)
        runs[fused] = _train(model, fused)
        model.close()
    (separate, separate_weights), (together, together_weights) = runs[False], runs[True]
    assert [step["applied"] for _, _, step in together] == [False, True] * STEPS
    assert together[-1][2]["lr"] == 2e-3 and together[-1][2]["optimizer_step"] == STEPS
    assert together == separate
    assert together_weights.keys() == separate_weights.keys()
    for name, value in separate_weights.items():
        np.testing.assert_array_equal(np.asarray(together_weights[name]), np.asarray(value), err_msg=name)


def test_fused_steps_are_counted_as_steps(tmp_path, config) -> None:  # type: ignore[no-untyped-def]
    from test_metrics import scrape, value

    from twinkle_client.model import TransformersModel

    model = TransformersModel(config=config, mixed_precision="no", seed=0, metrics=True, output_root=str(tmp_path))
    try:
        model.set_optimizer("AdamW", lr=1e-3)
        steps = [model.forward_backward_and_step(batch, gradient_accumulation_steps=GAS)[1] for batch in _batches()]
        timing = model.last_step_timing()
        samples = scrape(model.metrics_urls()[0])
    finally:
        model.close()
    assert value(samples, "twinkle_worker_calls_total", rpc="ForwardBackward", code="OK") == STEPS * GAS
    assert value(samples, "twinkle_worker_micro_steps_total", group="default") == STEPS * GAS
    assert value(samples, "twinkle_worker_optimizer_steps_total", group="default") == STEPS
    assert value(samples, "twinkle_worker_last_grad_norm", group="default") == steps[-1]["grad_norm"]
    assert timing is not None and timing.calls == GAS  # the step's window: one fused call per micro-batch
