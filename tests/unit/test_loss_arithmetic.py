"""Loss arithmetic and lr schedules, against plain torch / transformers references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twinkle_protocol.errors import InvalidArgument, NotFound
from twinkle_worker.losses import make_loss, token_logps
from twinkle_worker.optimizers import warmup_scheduler

# float32 arithmetic on values of order 1-10: 1e-5 relative is a few ulps of headroom.
RTOL, ATOL = 1e-5, 1e-6


def _logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_is_log_softmax_gathered_at_the_labels(temperature: float) -> None:
    logits, labels = _logits_and_labels()
    reference = torch.log_softmax(logits.double() / temperature, dim=-1)
    gathered = reference.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = torch.where(labels == -100, torch.zeros_like(gathered), gathered).float()
    result = token_logps(logits, labels, temperature)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=RTOL, atol=ATOL)
    assert (result[labels == -100] == 0).all()


def test_token_logps_is_float32_for_bfloat16_logits() -> None:
    logits, labels = _logits_and_labels()
    result = token_logps(logits.bfloat16(), labels, 1.0)
    assert result.dtype == torch.float32
    expected = token_logps(logits.bfloat16().float(), labels, 1.0)
    torch.testing.assert_close(result, expected, rtol=RTOL, atol=ATOL)


def test_cross_entropy_is_the_token_sum_and_its_gradient_matches_torch() -> None:
    logits, labels = _logits_and_labels()
    ours_logits = logits.clone().requires_grad_(True)
    mask = (labels != -100).float()
    result = make_loss("CrossEntropyLoss", {})(token_logps(ours_logits, labels, 1.0), mask, {"labels": labels})
    ref_logits = logits.clone().requires_grad_(True)
    reference = F.cross_entropy(ref_logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert result.num_tokens == int((labels != -100).sum()) == 12
    torch.testing.assert_close(result.loss_sum, reference, rtol=RTOL, atol=ATOL)
    result.loss_sum.backward()
    reference.backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=RTOL, atol=ATOL)


def test_importance_sampling_at_ratio_one_is_the_policy_gradient() -> None:
    logits, labels = _logits_and_labels()
    logits.requires_grad_(True)
    mask = (labels != -100).float()
    logps = token_logps(logits, labels, 1.0)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    result = make_loss("ImportanceSamplingLoss", {})(logps, mask, {"advantages": advantages})
    # ratio exp(logp - logp.detach()) is 1: the value is -sum(A * mask), the gradient -A * d logp.
    torch.testing.assert_close(result.loss_sum, -(advantages[:, None] * mask).sum(), rtol=RTOL, atol=ATOL)
    (grad,) = torch.autograd.grad(result.loss_sum, logits, retain_graph=True)
    (expected,) = torch.autograd.grad(-(advantages[:, None] * logps * mask).sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)


def test_loss_names_come_from_an_allow_list() -> None:
    assert make_loss("CrossEntropyLoss", {}).name == make_loss("cross_entropy", {}).name == "cross_entropy"
    with pytest.raises(NotFound, match="available"):
        make_loss("os.system", {})
    with pytest.raises(InvalidArgument):
        make_loss("CrossEntropyLoss", {"no_such_argument": 1})


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("CosineWarmupScheduler", {"num_warmup_steps": 3, "num_training_steps": 10}),
        ("CosineWarmupScheduler", {"num_warmup_steps": 0, "num_training_steps": 5}),
        ("CosineWarmupScheduler", {"num_warmup_steps": 2, "num_training_steps": 9, "num_cycles": 1.0}),
        ("LinearWarmupScheduler", {"num_warmup_steps": 3, "num_training_steps": 10}),
        ("LinearWarmupScheduler", {"num_warmup_steps": 0, "num_training_steps": 4}),
    ],
)
def test_warmup_schedules_match_twinkle_and_transformers(name: str, kwargs: dict) -> None:  # type: ignore[type-arg]
    # Twinkle's CosineWarmupScheduler / LinearWarmupScheduler are transformers' cosine / linear
    # schedules with warmup: lr rises linearly from 0 over the warmup steps, then decays to 0.
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    steps = kwargs["num_training_steps"]
    optimizer = _optimizer()
    ours = _lrs(warmup_scheduler(optimizer, name, dict(kwargs)), optimizer, steps)
    reference_optimizer = _optimizer()
    make = get_cosine_schedule_with_warmup if name == "CosineWarmupScheduler" else get_linear_schedule_with_warmup
    reference = _lrs(make(reference_optimizer, **kwargs), reference_optimizer, steps)
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-15)
    warmup = kwargs["num_warmup_steps"]
    assert max(ours) == pytest.approx(0.1)
    assert ours[warmup] == pytest.approx(0.1)  # the peak right after warmup
    if kwargs.get("num_cycles", 0.5) == 0.5:
        assert ours[warmup:] == sorted(ours[warmup:], reverse=True)  # then only decays


@pytest.mark.parametrize(
    "kwargs",
    [{"num_warmup_steps": 2}, {"num_warmup_steps": 5, "num_training_steps": 3}, {"num_training_steps": 3, "bogus": 1}],
)
def test_warmup_schedule_arguments_are_checked(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument):
        warmup_scheduler(_optimizer(), "CosineWarmupScheduler", kwargs)


def test_min_lr_ratio_floors_the_cosine() -> None:
    optimizer = _optimizer()
    scheduler = warmup_scheduler(optimizer, "CosineWarmupScheduler", {"num_training_steps": 4, "min_lr_ratio": 0.1})
    values = _lrs(scheduler, optimizer, 6)
    expected = [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, 4) / 4))) for step in range(6)]
    assert values == pytest.approx(expected, rel=1e-12)
