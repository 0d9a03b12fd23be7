"""Training through one real worker process: the loss falls, gRPC changes nothing numerically, and
gradient accumulation equals one step on the concatenated micro-batches (token-mean weighting).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from plain_reference import (
    ATOL,
    RTOL,
    assert_weights_equal,
    base_model,
    counting_samples,
    loss_sum,
    max_change,
    state,
    token_mean_loss,
)

from twinkle_worker import TransformersModel as InProcessModel

LORA = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
STEPS = 30


def _dataset(seed: int, count: int) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [counting_samples(rng, 4, [12, 9, 16, 5], prompt=2) for _ in range(count)]


def _train(model, batches, steps: int, adapter_name: str | None = None, gas: int = 1) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """The loop both models run: forward_backward, then clip_grad_and_step (which steps every `gas`)."""
    losses, norms = [], []
    for index in range(steps):
        out = model.forward_backward(batches[index % len(batches)], adapter_name=adapter_name)
        step = model.clip_grad_and_step(max_grad_norm=1.0, adapter_name=adapter_name, gradient_accumulation_steps=gas)
        if isinstance(step, dict):  # the client returns dicts, the in-process model dataclasses
            losses.append(out["loss"])
            norms.append(step["grad_norm"])
        else:
            losses.append(out.loss)
            norms.append(step.grad_norm if step.applied else None)
    return losses, norms


def test_loss_falls_and_matches_in_process_step_by_step(remote, config) -> None:  # type: ignore[no-untyped-def]
    dataset = _dataset(seed=1, count=3)
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=3e-3)
    remote_losses, remote_norms = _train(model, dataset, STEPS)

    # The loss falls clearly (about 5.5 -> 2.2 here; ln(256) = 5.55 is chance level).
    assert np.isfinite(remote_losses).all()
    assert np.mean(remote_losses[-3:]) < 0.5 * np.mean(remote_losses[:3]), remote_losses

    local = InProcessModel(config=config, mixed_precision="no", seed=0)
    local.set_optimizer("AdamW", lr=3e-3)
    local_losses, local_norms = _train(local, dataset, STEPS)
    local.close()
    # Same seed, same data, same arithmetic: the wire must not change a single step.
    np.testing.assert_allclose(remote_losses, local_losses, rtol=RTOL)
    np.testing.assert_allclose(remote_norms, local_norms, rtol=RTOL)


def test_lora_with_accumulation_matches_in_process(remote, config) -> None:  # type: ignore[no-untyped-def]
    dataset = _dataset(seed=4, count=4)
    model = remote(config=config, seed=0)
    assert model.add_adapter_to_model("sft", LORA) > 0
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    remote_losses, remote_norms = _train(model, dataset, 8, adapter_name="sft", gas=2)

    local = InProcessModel(config=config, mixed_precision="no", seed=0)
    local.add_adapter_to_model("sft", LORA)
    local.set_optimizer("AdamW", lr=1e-2, adapter_name="sft")
    local_losses, local_norms = _train(local, dataset, 8, adapter_name="sft", gas=2)
    local.close()
    assert remote_norms[0::2] == [None] * 4  # no step on odd micro-batches
    assert len(set(remote_losses)) == 8  # the adapter trains: losses move
    np.testing.assert_allclose(remote_losses, local_losses, rtol=RTOL)
    np.testing.assert_allclose(remote_norms[1::2], local_norms[1::2], rtol=RTOL)


def test_first_loss_is_the_plain_transformers_token_mean(remote, config) -> None:  # type: ignore[no-untyped-def]
    # The reported loss is sum(token CE) / label tokens over the micro-batch, uneven lengths included.
    batch = _dataset(seed=2, count=1)[0]
    model = remote(config=config, seed=0)
    out = model.forward_backward(batch)
    reference = base_model(config)
    assert out["num_tokens"] == sum(int((s["labels"] != -100).sum()) for s in batch)
    assert out["loss"] == pytest.approx(token_mean_loss(reference, batch), rel=RTOL)
    # per-sample logps come back unpadded and in order
    with torch.no_grad():
        for sample, logps in zip(batch, out["logps"], strict=True):
            logits = reference(input_ids=torch.as_tensor(sample["input_ids"])[None]).logits[0]
            labels = torch.as_tensor(sample["labels"])
            expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
            expected = torch.where(labels == -100, torch.zeros_like(expected), expected)
            np.testing.assert_allclose(logps, expected.numpy(), rtol=RTOL, atol=ATOL)


GAS = 4


def test_gradient_accumulation_equals_one_step_on_the_concatenation(remote, config) -> None:  # type: ignore[no-untyped-def]
    # 12 micro-batches of uneven lengths and prompt masks; the optimizer steps on 4, 8 and 12.
    rng = np.random.default_rng(3)
    micro_batches = [
        counting_samples(rng, 2, rng.integers(3, 15, 2).tolist(), prompt=int(rng.integers(0, 4))) for _ in range(12)
    ]
    lr, max_norm = 0.5, 1.0
    model = remote(config=config, seed=0)
    reference = base_model(config)
    initial = model.export_weights()
    assert_weights_equal(initial, state(reference), rtol=0, atol=0)  # same base weights, bit for bit
    model.set_optimizer("SGD", lr=lr, weight_decay=0.0)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=lr)

    for window in range(3):
        window_batches = micro_batches[window * GAS : (window + 1) * GAS]
        for index, batch in enumerate(window_batches, start=1):
            out = model.forward_backward(batch, gradient_accumulation_steps=GAS)
            # weights only move at window ends, so the reference's current loss must match
            assert out["loss"] == pytest.approx(token_mean_loss(reference, batch), rel=RTOL)
            step = model.clip_grad_and_step(max_grad_norm=max_norm, gradient_accumulation_steps=GAS)
            assert step["applied"] is (index == GAS)
            assert step["micro_step"] == window * GAS + index
            assert step["optimizer_step"] == window + (index == GAS)
        # The reference: ONE step on the 4 micro-batches together, loss = token sum / total label tokens.
        reference_optimizer.zero_grad()
        total, tokens = loss_sum(reference, [sample for batch in window_batches for sample in batch])
        (total / tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        assert norm > max_norm  # clipping is exercised, so a wrong norm would show in the weights
        assert step["grad_norm"] == pytest.approx(float(norm), rel=RTOL)
        reference_optimizer.step()

    final = model.export_weights()
    assert max_change(final, initial) > 1e-2  # the steps moved the weights well beyond the tolerance
    assert_weights_equal(final, state(reference))


def test_a_window_steps_once_however_often_step_is_called(remote) -> None:  # type: ignore[no-untyped-def]
    """A second clip_grad_and_step in an already-stepped window must not step (or advance the scheduler) again."""
    model = remote()
    model.set_optimizer("SGD", lr=0.1)
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    ids = np.arange(24).reshape(2, 12) % 200
    model.forward_backward({"input_ids": ids, "labels": ids})
    first = model.clip_grad_and_step(1.0)
    second = model.clip_grad_and_step(1.0)
    assert first["applied"] and first["optimizer_step"] == 1
    assert not second["applied"] and second["optimizer_step"] == 1
    assert model.step() is False and model.lr_step() is False
    model.forward_backward({"input_ids": ids, "labels": ids})
    third = model.clip_grad_and_step(1.0)
    assert third["applied"] and third["optimizer_step"] == 2
    assert third["lr"] == pytest.approx(0.05)  # halved once, not twice
