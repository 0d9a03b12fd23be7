"""Optimizers, lr schedulers, bf16 and the train-config summary, each against a plain torch /
transformers / peft reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from plain_reference import (
    RTOL,
    assert_weights_equal,
    base_model,
    counting_samples,
    padded_loss_sum,
    param_groups,
    state,
    token_mean_loss,
)


def _data(seed: int, count: int) -> list[list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [counting_samples(rng, 3, [10, 7, 12], prompt=1) for _ in range(count)]


def _lrs_of(scheduler_factory, steps: int, lr: float) -> list[float]:  # type: ignore[no-untyped-def]
    """The lr each optimizer step uses under a reference scheduler (torch / transformers)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = scheduler_factory(optimizer)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("CosineWarmupScheduler", {"num_warmup_steps": 2, "num_training_steps": 6}),
        ("LinearWarmupScheduler", {"num_warmup_steps": 1, "num_training_steps": 5}),
        ("StepLR", {"step_size": 2, "gamma": 0.5}),
    ],
)
def test_lr_scheduler_by_name(remote, config, name: str, kwargs: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    references = {
        "CosineWarmupScheduler": lambda optimizer: get_cosine_schedule_with_warmup(optimizer, **kwargs),
        "LinearWarmupScheduler": lambda optimizer: get_linear_schedule_with_warmup(optimizer, **kwargs),
        "StepLR": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, **kwargs),
    }
    lr, steps, gas = 1e-2, 6, 2
    expected = _lrs_of(references[name], steps, lr)
    assert len(set(expected)) > 2  # the schedule actually changes the lr over these steps
    model = remote(config=config, seed=0)
    model.set_optimizer("AdamW", lr=lr)
    assert model.set_lr_scheduler(name, **kwargs) == pytest.approx(expected[0], abs=1e-12)
    batch = _data(seed=20, count=1)[0]
    used = []
    for _ in range(steps * gas):  # the scheduler steps with the optimizer, not per micro-batch
        model.forward_backward(batch)
        step = model.clip_grad_and_step(gradient_accumulation_steps=gas)
        if step["applied"]:
            used.append(step["lr"])
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "name,options",
    [
        ("SGD", {"lr": 0.5, "weight_decay": 0.0, "momentum": 0.9}),
        ("Adam", {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.95)}),
        ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
def test_optimizer_steps_equal_plain_torch(remote, config, name: str, options: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
    batches = _data(seed=21, count=3)
    model = remote(config=config, seed=0)
    reference = base_model(config)
    initial = state(reference)
    model.set_optimizer(name, **options)
    extra = {k: v for k, v in options.items() if k not in ("lr", "weight_decay")}
    optimizer = getattr(torch.optim, name)(param_groups(reference, options["weight_decay"]), lr=options["lr"], **extra)
    for batch in batches:
        out = model.forward_backward(batch)
        model.clip_grad_and_step(max_grad_norm=0.0)  # 0: no clipping
        optimizer.zero_grad()
        # Adam divides by sqrt(v), so for a near-zero gradient entry even last-bit noise becomes a
        # visible update: the reference gets the same right-padded batch the worker builds.
        total, tokens = padded_loss_sum(reference, batch)
        assert out["loss"] == pytest.approx(total.item() / tokens, rel=RTOL)
        (total / tokens).backward()
        optimizer.step()
    trained = state(reference)
    assert max(float((trained[k] - initial[k]).abs().max()) for k in initial) > 1e-3
    exported = model.export_weights()
    if name == "SGD":
        assert_weights_equal(exported, trained)
        return
    # Adam's update g / (sqrt(v) + eps) is about lr * sign(g) for any g: an entry whose gradient
    # is near zero (float noise of cancelling contributions, ~1e-7 of the largest) can move
    # differently: a plain float32 run differs from a float64 one in up to ~2 % of the entries of
    # a tensor. So: 90 % of the entries within float32 tolerance, none off by a tenth of a step.
    # A wrong beta, decay group or step count moves 30-100 % of the entries of a tensor.
    # k_proj biases are excluded from the count: softmax ignores a shift shared by all keys, so
    # their true gradient is 0 and Adam moves them by +-lr on the sign of rounding noise.
    for key, expected in trained.items():
        actual = torch.as_tensor(np.array(exported[key]))
        if key.endswith("k_proj.bias"):
            assert float((actual - expected).abs().max()) <= 3 * options["lr"] * 1.01, key
            continue
        off = (actual - expected).abs() > 1e-6 + RTOL * expected.abs()
        assert off.float().mean() <= 0.1, (key, int(off.sum()))
        assert float((actual - expected).abs().max()) < 0.1 * options["lr"], key


def test_bf16_trains_with_finite_falling_loss(remote, config) -> None:  # type: ignore[no-untyped-def]
    batches = _data(seed=22, count=2)
    model = remote(config=config, seed=0, mixed_precision="bf16")
    model.set_optimizer("AdamW", lr=3e-3)
    losses = []
    for index in range(12):
        losses.append(model.forward_backward(batches[index % 2])["loss"])
        model.clip_grad_and_step(max_grad_norm=1.0)
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    # bf16 autocast keeps the loss close to the float32 one: bf16 has 8 bits of mantissa (~0.4 %).
    float32_loss = token_mean_loss(base_model(config), batches[0])
    assert losses[0] == pytest.approx(float32_loss, rel=1e-2)
    assert losses[0] != pytest.approx(float32_loss, rel=1e-6)  # autocast really ran in bf16


def test_get_train_configs_summary(remote, config) -> None:  # type: ignore[no-untyped-def]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = remote(config=config, seed=0)
    count = model.add_adapter_to_model("sft", lora, gradient_accumulation_steps=2)
    model.set_optimizer("AdamW", lr=3e-4, weight_decay=0.05, adapter_name="sft")
    model.set_lr_scheduler("CosineWarmupScheduler", adapter_name="sft", num_warmup_steps=1, num_training_steps=10)
    model.forward_backward(_data(seed=23, count=1)[0], adapter_name="sft")
    summary = model.get_train_configs(adapter_name="sft")
    lines = dict(line.split(": ", 1) for line in summary.splitlines())
    # trainable parameters: what plain peft counts for the same LoraConfig on the same model
    reference = get_peft_model(base_model(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    expected = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert count == expected
    assert lines["trainable_parameters"] == str(expected)
    assert lines["group"] == "sft"
    assert lines["gradient_accumulation_steps"] == "2"
    assert lines["micro_step"] == "1" and lines["optimizer_step"] == "0"
    assert lines["mixed_precision"] == "no"
    assert "AdamW" in lines["optimizer"] and "0.0003" in lines["optimizer"] and "0.05" in lines["optimizer"]
    assert "CosineWarmupScheduler" in lines["lr_scheduler"] and "10" in lines["lr_scheduler"]
    assert "CrossEntropyLoss" in lines["loss"]
    assert "'r': 4" in lines["lora"] and "q_proj" in lines["lora"] and "v_proj" in lines["lora"]
